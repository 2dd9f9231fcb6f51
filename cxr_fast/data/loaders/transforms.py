"""The OpenCV side of the processing (resize → CLAHE → augmentation, the reference the DALI graph is held to); the
contract both follow is `images/preprocess.py`."""

from __future__ import annotations

import cv2
import numpy as np

from cxr_fast.config import AugmentConfig, DataConfig
from cxr_fast.data.images.preprocess import gray8


def pad_to_square(gray: np.ndarray) -> np.ndarray:
    """The image centred on a black square as wide as its longer side (the background of a radiograph)."""
    height, width = gray.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return cv2.copyMakeBorder(gray, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT, value=0)


def map_to_source(values: np.ndarray, shape: tuple[int, int], fit: str) -> np.ndarray:
    """A map over the model's square input (a Grad-CAM) laid over the source image of `shape`: scaled back, and
    with `fit` pad, the padding cut off."""
    height, width = shape
    if fit != "pad" or height == width:
        return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    side = max(height, width)
    square = cv2.resize(values, (side, side), interpolation=cv2.INTER_LINEAR)
    top, left = (side - height) // 2, (side - width) // 2
    return square[top:top + height, left:left + width]


def process_gray(gray: np.ndarray, config: DataConfig, rng: np.random.Generator | None = None,
                 side: int | None = None) -> np.ndarray:
    """The OpenCV version of the DALI graph: pad to a square (`fit` pad) → resize (INTER_AREA) → CLAHE at
    `image_size` → resize to `side` (a progressive epoch's; CLAHE's tiles keep their size in the anatomy) → augment
    when `rng` is given."""
    if config.fit == "pad" and gray.shape[0] != gray.shape[1]:
        gray = pad_to_square(gray)
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
    return gray8(out)
