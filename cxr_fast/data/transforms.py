"""The OpenCV side of the processing (resize → CLAHE → augmentation, the reference the DALI graph is held to) and
the normalisation both backends share, on the target device."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from cxr_fast import constants as C
from cxr_fast.config import AugmentConfig, DataConfig


def normalize(images_u8: torch.Tensor, in_chans: int) -> torch.Tensor:
    """(N, 1, H, W) uint8 -> float (x - mean) / std, channels-last, with `in_chans` channels (gray replicated).
    Both backends end here, on the target device: uint8 crosses the bus, not float."""
    images = (images_u8.float() - C.GRAY_MEAN) / C.GRAY_STD
    if in_chans == 3:
        images = images.expand(-1, 3, -1, -1)
    return images.contiguous(memory_format=torch.channels_last)


def process_gray(gray: np.ndarray, config: DataConfig, rng: np.random.Generator | None = None,
                 side: int | None = None) -> np.ndarray:
    """The OpenCV version of the DALI graph: resize (INTER_AREA) → CLAHE at `image_size` → resize to `side` (a
    progressive epoch's; CLAHE's tiles keep their size in the anatomy) → augment when `rng` is given."""
    image = cv2.resize(gray, (config.image_size, config.image_size), interpolation=cv2.INTER_AREA)
    image = cv2.createCLAHE(clipLimit=config.clahe_clip_limit, tileGridSize=(config.clahe_tiles, config.clahe_tiles)
                            ).apply(image)
    if side is not None and side != config.image_size:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    return augment_cv(image, config.augment, rng) if rng is not None else image


def augment_cv(image: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Same transforms, probabilities and ranges as `dali._augment`."""
    size = image.shape[0]
    if rng.random() < aug.affine_prob:
        angle = rng.uniform(*aug.rotate_range)
        scale = rng.uniform(*aug.scale_range)
        matrix = cv2.getRotationMatrix2D((size / 2, size / 2), angle, scale)  # positive: counter-clockwise
        matrix[:, 2] += rng.uniform(*aug.translate_range, 2) * size
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
