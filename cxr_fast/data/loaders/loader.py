"""`create_loader(LoaderSpec)`: one specification for two interchangeable loaders that yield the same batches.

- `dali`: the DALI pipeline of `dali.py` (on the GPU when the target device is CUDA, unless `dali_cpu`).
- `torch`: the baseline a user would otherwise write: torch DataLoader workers reading the tars, OpenCV decode,
  resize (INTER_AREA), CLAHE and the same augmentations.
- `auto`: DALI where the target device is CUDA, else torch: on CPU-only machines DALI's CPU operators are slower
  than OpenCV's (benchmarks/RESULTS.md).

Both yield `Batch(images, targets, keys)`: images (N, C, H, W) float, channels-last, on the target device; targets
(N, classes) float, NaN where the label is not stated (the sample's mask; format 2 shards state every label); keys
the image names. Both give rank r of k the same samples, [floor(r n / k), floor((r+1) n / k))
of the split in manifest order (DALI's reader sharding), so every sample is seen exactly once per epoch, and
`len(loader)` is the number of batches this rank yields. The torch loader cuts its rank's range into contiguous
whole-batch runs, one per worker, so each worker reads only its part of the tars and only the last batch is short.
"""

from __future__ import annotations

import math
import multiprocessing.forkserver
import os
import random
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from cxr_fast.config import LOADER_CHOICES, DataConfig
from cxr_fast.data.shards.sample import decode_id, decode_image
from cxr_fast.data.loaders.dali import READER_NAME, build_pipeline
from cxr_fast.data.shards.manifest import has_mask, load_manifest, split_shards
from cxr_fast.data.shards.tars import walk_tar
from cxr_fast.data.images.preprocess import Preprocessing
from cxr_fast.data.loaders.transforms import process_gray
from cxr_fast.errors import CxrFastError


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader reads and makes: one split of a shard set, as batches for one rank on one device.

    train=True shuffles and augments, False reads in order without augmentation; dali_cpu keeps the DALI pipeline on
    the CPU even when `device` is CUDA; normalize=False yields the uint8 images (preview, fidelity checks). `side`
    is the output side of a progressive epoch: the image is processed (CLAHE) at `data.image_size`, as always, and
    then resized to `side`, so it looks the same at every side; None: `data.image_size`."""

    shards: str | Path
    split: str
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 32
    train: bool = False
    loader: str = "auto"
    device: torch.device | str = "cpu"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    normalize: bool = True
    dali_cpu: bool = False
    side: int | None = None


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    keys: list[str]


def rank_range(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The samples of one rank, as DALI's reader shards them: [floor(r n / k), floor((r + 1) n / k))."""
    return total * rank // world_size, total * (rank + 1) // world_size


def resolve_loader(loader: str, device: torch.device) -> str:
    """auto → dali on a CUDA device when DALI is installed, else torch."""
    if loader not in LOADER_CHOICES:
        raise CxrFastError(f"unknown loader {loader!r}: use {', '.join(LOADER_CHOICES)}")
    if loader != "auto":
        return loader
    if device.type != "cuda":
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torch"
    return "dali"


# ------------------------------------------------------------------------------------------------------- torch
class ShardDataset(torch.utils.data.IterableDataset):
    """Whole batches of one rank's samples for the DataLoader: worker w of W takes batches [w nb / W, (w+1) nb / W)
    of the rank's nb batches, a contiguous run of samples, and reads only the tars (and members) it overlaps."""

    def __init__(self, tars: list[tuple[str, int]], lo: int, hi: int, spec: LoaderSpec, masked: bool):
        super().__init__()
        self.tars, self.lo, self.hi, self.batch_size, self.masked = tars, lo, hi, spec.batch_size, masked
        self.config, self.train, self.side = spec.data, spec.train, spec.side
        # The epoch's seed in shared memory: persistent workers read it at the start of every epoch.
        self.seed_cell = torch.tensor([spec.seed], dtype=torch.int64).share_memory_()

    def _range(self, worker: int, workers: int) -> tuple[int, int]:
        batches = math.ceil((self.hi - self.lo) / self.batch_size)
        first, last = batches * worker // workers, batches * (worker + 1) // workers
        return self.lo + first * self.batch_size, min(self.hi, self.lo + last * self.batch_size)

    def _samples(self, start: int, stop: int):
        offset = 0
        for tar, count in self.tars:
            if offset < stop and start < offset + count:
                yield from walk_tar(tar, start=max(0, start - offset), stop=min(count, stop - offset))
            offset += count

    def _shuffled(self, samples, rng: random.Random):
        """A shuffle buffer, as webdataset's: shards are shuffled when written, this mixes neighbours."""
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.config.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start, stop = self._range(worker, workers)
        samples = self._samples(start, stop)
        rng, seed = None, int(self.seed_cell[0])
        if self.train:
            samples = self._shuffled(samples, random.Random(seed * 1_000_003 + start))
            rng = np.random.default_rng([seed, start])
        images, labels, keys = [], [], []
        for key, sample in samples:
            try:
                gray = decode_image(sample)
                label = np.frombuffer(sample["labels"], np.uint8)
                if self.masked:  # float labels, NaN where not stated; format 2 samples state every label
                    label = np.where(np.frombuffer(sample["mask"], np.uint8) > 0, label, np.nan)
            except (ValueError, KeyError) as error:
                raise CxrFastError(f"sample {key}: {error}") from None
            images.append(process_gray(gray, self.config, rng, self.side))
            labels.append(label.astype(np.float32))
            keys.append(key)
            if len(keys) == self.batch_size:
                yield _collate(images, labels, keys)
                images, labels, keys = [], [], []
        if keys:
            yield _collate(images, labels, keys)


def _collate(images, labels, keys):
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(labels)), keys


def _init_worker(_worker_id: int) -> None:
    # Parallelism comes from the workers; OpenCV's own thread pool inside each would oversubscribe the cores.
    cv2.setNumThreads(1)
    # A process group of its own: a SIGTERM sent to the job's group on preemption reaches the main process, which
    # finishes its step and saves last.pt with the workers still serving it (a signal to each process is handled
    # there too: the run stops at its last optimizer step). The forkserver ignores SIGTERM (`data/forkserver_init.py`);
    # a worker does not.
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Loader:
    """What both loaders share: the batch count and the last step, uint8 on the device → Batch."""

    def __init__(self, spec: LoaderSpec, batches: int):
        self.device, self.batches = torch.device(spec.device), batches
        self.preprocessing = Preprocessing.of(spec.data) if spec.normalize else None  # None: uint8 batches

    def __len__(self):
        return self.batches

    def _batch(self, images_u8: torch.Tensor, labels: torch.Tensor, keys: list[str],
               mask: torch.Tensor | None = None) -> Batch:
        images = images_u8.to(self.device, non_blocking=True)
        images = self.preprocessing.normalize(images) if self.preprocessing is not None else images
        targets = labels.to(self.device, non_blocking=True).float()
        if mask is not None:
            targets = targets.masked_fill(mask.to(self.device, non_blocking=True) == 0, float("nan"))
        return Batch(images, targets, keys)


class TorchLoader(_Loader):
    def __init__(self, tars: list[tuple[str, int]], lo: int, hi: int, spec: LoaderSpec, masked: bool):
        super().__init__(spec, math.ceil((hi - lo) / spec.batch_size))
        workers = min(spec.data.workers, self.batches)  # no idle workers
        if workers:  # takes effect when the forkserver starts, with the first workers
            multiprocessing.forkserver.set_forkserver_preload(["__main__", "cxr_fast.data.forkserver_init"])
        self.dataset = dataset = ShardDataset(tars, lo, hi, spec, masked)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=workers, pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None, worker_init_fn=_init_worker,
            persistent_workers=workers > 0,  # iterating again (the next epoch) keeps the workers
            # Its own generator: the DataLoader draws a seed per iteration, which must not advance the global RNG
            # (dropout's): a resumed run creates its loader at another step than the uninterrupted run did.
            generator=torch.Generator().manual_seed(spec.seed),
            # Not fork: a process that has run DALI (or CUDA) holds threads whose locks a forked child inherits.
            multiprocessing_context="forkserver" if workers else None)

    def reseed(self, seed: int) -> None:
        """The next iteration (epoch) shuffles and augments as a loader built with `seed` would: the workers stay."""
        self.dataset.seed_cell[0] = seed

    def __iter__(self):
        for images, labels, keys in self.loader:
            yield self._batch(images, labels, list(keys))


# -------------------------------------------------------------------------------------------------------- DALI
class DaliLoader(_Loader):
    def __init__(self, tars: list[Path], manifest: dict, spec: LoaderSpec):
        # DALI is imported only when this loader is asked for: the CLI and the torch loader work without it.
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        lo, hi = rank_range(manifest["splits"][spec.split]["images"], spec.rank, spec.world_size)
        super().__init__(spec, math.ceil((hi - lo) / spec.batch_size))
        self.outputs = ["images", "labels", "ids"] + (["mask"] if has_mask(manifest) else [])
        device = self.device
        on_gpu = device.type == "cuda" and not spec.dali_cpu
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        try:
            self.pipe = build_pipeline([str(t) for t in tars], manifest["image_ext"], spec, device_id,
                                       has_mask(manifest))
            # PARTIAL with padded shards: every sample exactly once per epoch, no duplicates from the padding.
            self.iterator = DALIGenericIterator(self.pipe, self.outputs, reader_name=READER_NAME,
                                                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        except RuntimeError as error:
            raise CxrFastError(f"DALI cannot read the shards: {_dali_reason(error)}") from None

    def __iter__(self):
        try:
            for index, (out,) in enumerate(self.iterator):
                if index >= self.batches:
                    # A rank with fewer samples than the largest shard gets batches of padding only; drop them.
                    continue
                # HWC batch viewed as NCHW: channels-last strides, no copy.
                yield self._batch(out["images"].permute(0, 3, 1, 2), out["labels"],
                                  [decode_id(row) for row in out["ids"].numpy()], out.get("mask"))
        except RuntimeError as error:
            raise CxrFastError(f"DALI failed while reading the shards: {_dali_reason(error)}") from None


def _dali_reason(error: Exception) -> str:
    """The operator's own message out of DALI's long error text (it names the file at fault)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("C++ context", 1)[0]
    return " ".join(text.split())[:600]


def create_loader(spec: LoaderSpec):
    """A loader over one split (see LoaderSpec); `auto` is resolved for the spec's device."""
    if spec.batch_size < 1:
        raise CxrFastError(f"batch size must be at least 1, got {spec.batch_size}")
    if spec.data.workers is None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        spec = replace(spec, data=replace(spec.data, workers=max(1, (os.cpu_count() or 1) // ranks_here)))
    manifest = load_manifest(spec.shards)
    tars = split_shards(spec.shards, spec.split, manifest)
    total = manifest["splits"][spec.split]["images"]
    lo, hi = rank_range(total, spec.rank, spec.world_size)
    if lo == hi:
        raise CxrFastError(f"split {spec.split!r} has {total} images, too few for {spec.world_size} ranks")
    if resolve_loader(spec.loader, torch.device(spec.device)) == "dali":
        return DaliLoader(tars, manifest, spec)
    names = manifest["splits"][spec.split]["shards"]
    counts = [(str(tar), manifest["shards"][name]["samples"]) for tar, name in zip(tars, names)]
    return TorchLoader(counts, lo, hi, spec, has_mask(manifest))


class SyntheticLoader:
    """On-device batches with the real loaders' interface (`len`, `device`, iteration of `Batch`): random normalised
    channels-last images and labels, made once, so a measurement sees the model's speed alone (the compute
    ceiling). `spec.data` gives the side and channels, `spec.batch_size` the batch; `batches` per iteration."""

    def __init__(self, spec: LoaderSpec, batches: int, classes: int):
        self.device, self.batches = torch.device(spec.device), batches
        generator = torch.Generator().manual_seed(spec.seed)
        side, size = spec.data.image_size, spec.batch_size
        images = torch.randint(0, 256, (size, 1, side, side), dtype=torch.uint8, generator=generator)
        targets = (torch.rand(size, classes, generator=generator) > 0.9).float()
        self.batch = Batch(Preprocessing.of(spec.data).normalize(images.to(self.device)), targets.to(self.device),
                           [f"synthetic-{i}" for i in range(size)])

    def __len__(self):
        return self.batches

    def __iter__(self):
        for _ in range(self.batches):
            yield self.batch
