"""One `create_loader()` for two interchangeable backends that yield the same batches.

- `dali`: the DALI pipeline of `pipeline.py` (GPU when the target device is CUDA, else CPU).
- `torch`: the baseline a user would otherwise write: webdataset + torch DataLoader workers + OpenCV decode, resize
  (INTER_AREA), CLAHE and the same augmentations.

Both yield `Batch(images, targets, keys)`: images (N, C, H, W) float, channels-last, on the target device; targets
(N, 14) float; keys the image names. Every sample of a split is seen exactly once per epoch across `world_size`
ranks (DALI: one reader shard per rank with padding; torch: sample i goes to worker i mod (ranks x workers)).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from cxr_fast import constants as C
from cxr_fast.config import AugmentConfig, DataConfig
from cxr_fast.errors import CxrFastError
from cxr_fast.shards import decode_id, decode_image, iter_samples, load_manifest, split_shards


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor
    keys: list[str]


def normalize(images_u8: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(N, 1, H, W) uint8 -> float (x - mean) / std, channels-last, with `in_chans` channels (gray replicated).
    Both backends end here, on the target device: uint8 crosses the bus, not float."""
    images = (images_u8.float() - C.GRAY_MEAN) / C.GRAY_STD
    if in_chans == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------- OpenCV path
def process_gray(gray: np.ndarray, cfg: DataConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """The OpenCV version of the DALI graph: resize (INTER_AREA) → CLAHE → augment when `rng` is given."""
    image = cv2.resize(gray, (cfg.image_size, cfg.image_size), interpolation=cv2.INTER_AREA)
    image = cv2.createCLAHE(clipLimit=cfg.clahe_clip_limit, tileGridSize=(cfg.clahe_tiles, cfg.clahe_tiles)
                            ).apply(image)
    return augment_cv(image, cfg.augment, rng) if rng is not None else image


def augment_cv(image: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Same transforms, probabilities and ranges as `pipeline._augment`."""
    size = image.shape[0]
    if rng.random() < aug.affine_prob:
        angle = rng.uniform(-aug.rotate_degrees, aug.rotate_degrees)
        scale = rng.uniform(*aug.scale_range)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)
        matrix[:, 2] += rng.uniform(-aug.translate_fraction, aug.translate_fraction, 2) * size
        image = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    if rng.random() < aug.hflip_prob:
        image = image[:, ::-1]
    out = image.astype(np.float32)
    if rng.random() < aug.brightness_contrast_prob:
        brightness, contrast = rng.uniform(*aug.brightness_range), rng.uniform(*aug.contrast_range)
        out = brightness * (128.0 + contrast * (out - 128.0))
    if rng.random() < aug.noise_prob:
        out = out + rng.normal(0.0, aug.noise_std, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of a split's tars for the torch DataLoader; each (rank, worker) takes every k-th sample."""

    def __init__(self, tars: list[Path], cfg: DataConfig, train: bool, seed: int, rank: int, world_size: int):
        super().__init__()
        self.tars, self.cfg, self.train = [str(t) for t in tars], cfg, train
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def _samples(self):
        import webdataset as wds

        def name_the_shard(error):  # webdataset appends the shard URL to the error's arguments
            raise CxrFastError(f"damaged shard: {error}")

        stages = [wds.SimpleShardList(self.tars), wds.tarfile_to_samples(handler=name_the_shard)]
        if self.train:
            # Every worker shuffles with the same seed, so "every k-th sample" still partitions the epoch.
            stages.append(wds.shuffle(self.cfg.shuffle_buffer, initial=self.cfg.shuffle_buffer,
                                      rng=random.Random(self.seed)))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stride, offset = self.world_size * workers, self.rank * workers + worker
        rng = np.random.default_rng([self.seed, offset]) if self.train else None
        for index, sample in enumerate(self._samples()):
            if index % stride != offset:
                continue
            try:
                gray = decode_image(sample)
            except ValueError as error:
                raise CxrFastError(f"{sample.get('__url__')}: {error}") from None
            image = process_gray(gray, self.cfg, rng)
            yield torch.from_numpy(image)[None], torch.from_numpy(np.frombuffer(sample["labels"], np.uint8).copy()), \
                sample["__key__"]


# ------------------------------------------------------------------------------------------------------- loaders
def _one_thread_per_worker(_worker_id: int) -> None:
    # Parallelism comes from the workers; OpenCV's own thread pool inside each would oversubscribe the cores.
    cv2.setNumThreads(1)


class _Loader:
    """What both backends share: the batch count and the last step, uint8 on the device → Batch."""

    def __init__(self, cfg: DataConfig, batch_size: int, device: torch.device, normalize: bool, num_samples: int):
        self.cfg, self.batch_size, self.device = cfg, batch_size, device
        self.normalize, self.num_samples = normalize, num_samples

    def __len__(self):
        return math.ceil(self.num_samples / self.batch_size)

    def _batch(self, images_u8: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> Batch:
        images = images_u8.to(self.device, non_blocking=True)
        images = normalize(images, self.cfg.in_chans) if self.normalize else images
        return Batch(images, labels.to(self.device, non_blocking=True).float(), keys)


class TorchLoader(_Loader):
    def __init__(self, tars, cfg, batch_size, train, device, seed, rank, world_size, normalize, num_samples):
        super().__init__(cfg, batch_size, device, normalize, num_samples)
        dataset = ShardDataset(tars, cfg, train, seed, rank, world_size)
        workers = cfg.num_threads
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None, worker_init_fn=_one_thread_per_worker,
            persistent_workers=workers > 0,  # a loader iterated again (the next epoch) keeps its workers
            # Not fork: a process that has run DALI (or CUDA) holds threads whose locks a forked child inherits.
            multiprocessing_context="forkserver" if workers else None)

    def __iter__(self):
        for images, labels, keys in self.loader:
            yield self._batch(images, labels, list(keys))


class DaliLoader(_Loader):
    def __init__(self, tars, image_ext, cfg, batch_size, train, device, seed, rank, world_size, normalize,
                 num_samples, dali_gpu=None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from cxr_fast.pipeline import READER_NAME, build_pipeline

        super().__init__(cfg, batch_size, device, normalize, num_samples)
        on_gpu = device.type == "cuda" if dali_gpu is None else dali_gpu
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        try:
            self.pipe = build_pipeline([str(t) for t in tars], image_ext, cfg, batch_size=batch_size, train=train,
                                       device_id=device_id, seed=seed, shard_id=rank, num_shards=world_size)
            # PARTIAL with padded shards: every sample exactly once per epoch, no duplicates from the padding.
            self.iterator = DALIGenericIterator(self.pipe, ["images", "labels", "ids"], reader_name=READER_NAME,
                                                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        except RuntimeError as error:
            raise CxrFastError(f"DALI cannot read the shards: {_dali_reason(error)}") from None

    def __iter__(self):
        try:
            for (out,) in self.iterator:
                # HWC batch viewed as NCHW: channels-last strides, no copy.
                yield self._batch(out["images"].permute(0, 3, 1, 2), out["labels"],
                                  [decode_id(row) for row in out["ids"].numpy()])
        except RuntimeError as error:
            raise CxrFastError(f"DALI failed while reading the shards: {_dali_reason(error)}") from None


def _dali_reason(error: Exception) -> str:
    """The operator's own message out of DALI's long error text (it names the file at fault)."""
    text = str(error)
    if "encountered:" in text:
        text = text.split("encountered:", 1)[1].split("C++ context", 1)[0]
    return " ".join(text.split())[:600]


def create_loader(backend: str, shards_dir: str | Path, split: str, cfg: DataConfig, *, batch_size: int,
                  train: bool, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                  normalize: bool = True, dali_gpu: bool | None = None):
    """A loader over one split. train=True shuffles and augments; False reads in order, without augmentation.

    dali_gpu=False keeps the DALI pipeline on the CPU even when `device` is CUDA (benchmarks); None follows device.
    """
    if cfg.num_threads is None:
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        cfg = dataclasses.replace(cfg, num_threads=max(1, (os.cpu_count() or 1) // ranks_here))
    manifest = load_manifest(shards_dir)
    tars = split_shards(shards_dir, split, manifest)
    total = manifest["splits"][split]["images"]
    num_samples = len(range(rank, total, world_size)) if backend == "torch" else _dali_shard_size(total, rank,
                                                                                                   world_size)
    device = torch.device(device)
    if backend == "dali":
        return DaliLoader(tars, manifest["image_ext"], cfg, batch_size, train, device, seed, rank, world_size,
                          normalize, num_samples, dali_gpu)
    if backend == "torch":
        return TorchLoader(tars, cfg, batch_size, train, device, seed, rank, world_size, normalize, num_samples)
    raise CxrFastError(f"unknown loader {backend!r}: use dali or torch")


def _dali_shard_size(total: int, shard_id: int, num_shards: int) -> int:
    # DALI's reader gives shard i the samples [floor(i * n / k), floor((i + 1) * n / k)).
    return (total * (shard_id + 1)) // num_shards - (total * shard_id) // num_shards


def load_processed(shards_dir: str | Path, split: str, keys: set[str], cfg: DataConfig) -> dict[str, np.ndarray]:
    """Processed uint8 images (no augmentation) of the given keys, for Grad-CAM overlays: a scan of the split's tars
    that decodes only the wanted samples."""
    found = {}
    for tar in split_shards(shards_dir, split):
        for key, sample in iter_samples(tar):
            if key in keys:
                found[key] = process_gray(decode_image(sample), cfg)
    return found


def write_preview(shards_dir: str | Path, split: str, backend: str, cfg: DataConfig, n: int, out: str | Path,
                  augment: bool, seed: int = 0) -> list[Path]:
    """Write the first `n` processed images (uint8 after CLAHE and augmentation, before normalisation) as
    `out/<image_index>`, and with augmentation a contact sheet, so a person can see what the model sees."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loader = create_loader(backend, shards_dir, split, cfg, batch_size=min(n, 16), train=augment, seed=seed,
                           normalize=False)
    images = {}
    for batch in loader:
        for key, image in zip(batch.keys, batch.images):
            if len(images) < n:
                images[key] = image[0].cpu().numpy()
        if len(images) >= n:
            break
    paths = []
    for key, image in images.items():
        paths.append(out / f"{key}.png")
        cv2.imwrite(str(paths[-1]), image)
    if augment and images:
        paths.append(out / "contact_sheet.png")
        cv2.imwrite(str(paths[-1]), contact_sheet(list(images.values())))
    return paths


def contact_sheet(images: list[np.ndarray], columns: int = 4, tile: int = 256) -> np.ndarray:
    tiles = [cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA) for image in images]
    tiles += [np.zeros((tile, tile), np.uint8)] * (-len(tiles) % columns)
    return np.vstack([np.hstack(tiles[i:i + columns]) for i in range(0, len(tiles), columns)])
