"""A training run's set-up: where it runs (device, rank, DDP), how it plans its epochs (whole optimizer steps, the
side of each epoch), and the model and the state the engine steps (optimizer, schedule, scaler, compiled model).
`cxr-fast train`, `bench train` and `bench recipe` build their trainer here, so they measure what ships.

`--batch-size auto`: the largest micro-batch that fits the GPU, found by trying one training step at each size
(32, 16, 8, ... down to 1) and falling back on out-of-memory; accumulation makes up the effective batch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from cxr_fast.config import RunConfig, replace
from cxr_fast.errors import CxrFastError
from cxr_fast.training.checkpoint import restore_training
from cxr_fast.training.compiled import compile_model
from cxr_fast.training.engine import TrainState, autocast, resolve_amp, resolve_device, warmup_cosine
from cxr_fast.training.losses import FocalLoss, inverse_frequency_weights
from cxr_fast.training.model import create_model
from cxr_fast.training.resolution import side_schedule


log = logging.getLogger(__name__)
# The validation batch against the training micro-batch: no activations are kept for a backward pass.
EVAL_BATCH_FACTOR = 2


@dataclass(frozen=True)
class Env:
    """Where this process runs and in what precision: its rank among `world_size` ranks, its device, and the
    autocast dtype (None: float32) the run's --amp resolves to there."""

    rank: int
    world_size: int
    device: torch.device
    amp_dtype: torch.dtype | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Plan:
    classes: tuple[str, ...]  # the shard set's, in its order: the model's outputs
    train_images: int
    steps_per_epoch: int  # optimizer steps
    batches_per_epoch: int  # micro-batches per rank
    sides: tuple[int, ...] = ()  # the training side of each epoch

    def total_steps(self, epochs: int) -> int:
        return self.steps_per_epoch * epochs


def epoch_sides(config: RunConfig) -> list[int]:
    """The training side of each epoch (the progressive schedule, or --image-size throughout)."""
    return side_schedule(config.data.image_size, config.optim.epochs, config.optim.progressive,
                         config.optim.progressive_final_epochs)


def validated_epochs(epochs: int, every: int) -> set[int]:
    """The epochs (counted from 1) that end with a validation: every `every`-th, and each of the last `every`."""
    return {epoch for epoch in range(1, epochs + 1) if epoch % every == 0 or epoch > epochs - every}


def setup_distributed(device_choice: str, cudnn_benchmark: bool = True, amp: str = "auto") -> Env:
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
    return Env(rank, world_size, device, resolve_amp(amp, device))


def check_splits(manifest: dict, world_size: int) -> None:
    """Before any model is built: a training image per rank and a validation split to choose thresholds on."""
    if manifest["splits"]["train"]["images"] < world_size:
        raise CxrFastError(f"{manifest['splits']['train']['images']} training images are too few for {world_size} rank(s)")
    if not manifest["splits"]["val"]["images"]:
        raise CxrFastError("the shards have an empty validation split; re-shard with --val-fraction > 0")


def check_classes(manifest: dict, resumed: dict | None) -> None:
    """A resumed run continues on shards of the classes it was trained on."""
    if resumed is not None and list(resumed["class_names"]) != list(manifest["classes"]):
        raise CxrFastError(f"the checkpoint was trained on classes {', '.join(resumed['class_names'])[:300]}; these "
                           f"shards have {', '.join(manifest['classes'])[:300]}")


def plan_epochs(config: RunConfig, manifest: dict, world_size: int) -> Plan:
    """Whole optimizer steps per epoch, the same on every rank (each rank's remainder is left for the next epoch's
    shuffle)."""
    n_train = manifest["splits"]["train"]["images"]
    batch, accum = config.optim.batch_size, config.optim.accum
    steps = (n_train // world_size) // batch // accum
    if steps < 1:
        raise CxrFastError(f"{n_train} training images are too few for batch {batch} x accum {accum} x {world_size} "
                           "rank(s); lower --batch-size or --accum")
    return Plan(tuple(manifest["classes"]), n_train, steps, steps * accum, tuple(epoch_sides(config)))


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 31)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on norms and biases (1-d parameters), as timm does.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_input_sides(model: torch.nn.Module, name: str, sides: set[int]) -> None:
    """A model with a fixed input size (a ViT's patch grid) refuses other sides before any work, with a message."""
    patch = getattr(model, "patch_embed", None)
    size = getattr(patch, "img_size", None)
    if size is None or getattr(patch, "dynamic_img_size", False) or getattr(patch, "strict_img_size", True) is False:
        return
    other = sorted(side for side in sides if (side, side) != tuple(size))
    if other:
        raise CxrFastError(f"{name} takes {size[0]} x {size[1]} inputs only, not {other[0]} px: set --image-size "
                           f"{size[0]} (without --progressive), or choose a convolutional model")


def build_model(config: RunConfig, env: Env, resumed: dict | None, classes: int):
    """The model with its weights (loaded before any wrapping) and its EMA."""
    model = create_model(config.model, config.data.in_chans, classes,
                         pretrained=None if resumed is None else False).to(env.device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    ema = None
    if config.optim.ema_decay > 0:
        ema = ModelEmaV3(model, decay=config.optim.ema_decay)
    return model, ema


def build_state(config: RunConfig, plan: Plan, env: Env, model: torch.nn.Module, ema, loss_fn: torch.nn.Module
                ) -> TrainState:
    """Optimizer (fused AdamW on CUDA), schedule and scaler around the (possibly compiled, DDP-wrapped) model."""
    check_input_sides(model, config.model.name, set(plan.sides))
    train_model = compile_model(model, config.model, env.device, len(set(plan.sides)))
    if env.distributed:
        # Gradients as views of DDP's buckets: one copy less per step and less memory.
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                  fused=env.device.type == "cuda" or None)
    total = plan.total_steps(config.optim.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total, int(config.optim.warmup_fraction * total), config.optim.min_lr_ratio))
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
    return TrainState(train_model, optimizer, scheduler, scaler, env.amp_dtype, config.optim.accum,
                      config.optim.clip_grad_norm, loss_fn.to(env.device), env.device, plan.classes, ema)


def set_up_training(config: RunConfig, manifest: dict, env: Env, resumed: dict | None):
    """What `cxr-fast train` trains with, before its first epoch: the splits and classes checked, the model (the same
    initial weights on every rank), the micro-batch resolved, the plan and the state the engine steps, restored from
    `resumed` where given. Returns (config with the batch resolved, plan, state, the plain model, best AUROC so far)."""
    check_splits(manifest, env.world_size)
    torch.manual_seed(config.seed)  # the same initial weights on every rank, so the ranks' EMAs agree
    check_classes(manifest, resumed)
    model, ema = build_model(config, env, resumed, len(manifest["classes"]))
    torch.manual_seed(config.seed + env.rank)  # then each rank its own dropout and augmentation draws
    config = resolve_batch(config, model, env.device, env.amp_dtype)
    plan = plan_epochs(config, manifest, env.world_size)
    weights = inverse_frequency_weights(manifest["splits"]["train"], plan.classes) \
        if config.optim.class_weighting == "inverse_frequency" else None
    state = build_state(config, plan, env, model, ema, FocalLoss(config.optim.focal_gamma, weights))
    best_auc = restore_training(resumed, state, env.rank) if resumed is not None else -1.0
    return config, plan, state, model, best_auc


def build_trainer(config: RunConfig, device: torch.device, classes: tuple[str, ...], train_images: int):
    """(TrainState, model) for one process as `cxr-fast train` builds them, for the measurements (`bench train`,
    `bench recipe`, the GPU probe): the model (compiled where the run would be, one graph per side of its schedule),
    the micro-batch and accumulation resolved as the run resolves them (`state.accum`), fused AdamW on CUDA, cuDNN's
    autotuning as set, the run's schedule over `train_images` an epoch, the scaler and the focal loss over
    `classes`."""
    env = Env(0, 1, device, resolve_amp(config.amp, device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark
    torch.manual_seed(config.seed)  # the run's initial weights: settings compared in two processes start alike
    model, ema = build_model(config, env, None, len(classes))
    config = resolve_batch(config, model, device, env.amp_dtype)
    plan = plan_epochs(config, {"classes": list(classes), "splits": {"train": {"images": train_images}}}, 1)
    return build_state(config, plan, env, model, ema, FocalLoss(config.optim.focal_gamma)), model


# ------------------------------------------------------------------------------------------ --batch-size auto
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
