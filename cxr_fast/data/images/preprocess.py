"""The one image contract after decoding: what every picture becomes before the model sees it, read by the DALI
pipeline, the OpenCV baseline, `Predictor` and `export`'s model.json alike.

8-bit gray (a source of more bits is mapped over its range, a DICOM through its LUTs: `source.py`, `dicom.py`), fitted
to a square (`pad` on black, or `squash`), resized to the side, CLAHE, then normalised as `(x - mean) / std` with one
or three identical channels. The mean and std: the model's stem is ImageNet-pretrained and timm folds a 3-channel stem
into one channel by summing its weights, which matches feeding the same gray value to R, G and B; the matching
statistics are the means of ImageNet's per-channel mean and std (0.485/0.456/0.406 and 0.229/0.224/0.225), on the
8-bit scale.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

BIT_DEPTH = 8
GRAY_MAX = 2 ** BIT_DEPTH - 1
GRAY_MEAN = 0.449 * GRAY_MAX
GRAY_STD = 0.226 * GRAY_MAX


def gray8(values: np.ndarray) -> np.ndarray:
    """Gray levels (floats on the 8-bit scale) rounded and clipped into uint8."""
    return np.clip(np.rint(values), 0, GRAY_MAX).astype(np.uint8)


def gray8_from_unit(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (a rendered DICOM) as 8-bit gray."""
    return gray8(np.clip(unit, 0.0, 1.0) * GRAY_MAX)


def unit_from_gray8(values: np.ndarray) -> np.ndarray:
    return values / GRAY_MAX


def gray8_over_range(image: np.ndarray) -> np.ndarray:
    """A picture of more bits (a 16-bit PNG) mapped over the range it uses: its lowest value black, its highest white."""
    low, high = float(image.min()), float(image.max())
    return gray8((image.astype(np.float64) - low) * (GRAY_MAX / (high - low))) if high > low else \
        np.zeros(image.shape, np.uint8)


def gray_share(low: float, high: float) -> float:
    """The share of the 8-bit range between two gray levels."""
    return (high - low) / GRAY_MAX


def gray8_from_input(image: torch.Tensor) -> np.ndarray:
    """The gray uint8 image back from one normalised model input (exact: normalisation is affine on integers)."""
    gray = image[0].float() * GRAY_STD + GRAY_MEAN
    return gray.round().clamp(0, GRAY_MAX).to(torch.uint8).cpu().numpy()


@dataclass(frozen=True)
class Preprocessing:
    """The model input as a trained model expects it; `of(DataConfig)` is the run's."""

    side: int
    fit: str
    clahe_clip_limit: float
    clahe_tiles: int
    in_chans: int
    bit_depth: int = BIT_DEPTH
    gray_mean: float = GRAY_MEAN
    gray_std: float = GRAY_STD

    @classmethod
    def of(cls, data) -> Preprocessing:
        return cls(data.image_size, data.fit, data.clahe_clip_limit, data.clahe_tiles, data.in_chans)

    def normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) uint8 → float (x - mean) / std, channels-last, `in_chans` channels (gray replicated). Both
        loaders end here, on the target device: uint8 crosses the bus, not float."""
        images = (images_u8.float() - self.gray_mean) / self.gray_std
        if self.in_chans == 3:
            images = images.expand(-1, 3, -1, -1)
        return images.contiguous(memory_format=torch.channels_last)

    def input_range(self, slack: float = 1e-3) -> tuple[float, float]:
        """The values a normalised input can take."""
        return (0 - self.gray_mean) / self.gray_std - slack, (GRAY_MAX - self.gray_mean) / self.gray_std + slack

    def describe(self) -> dict:
        """model.json's `preprocessing`: every number a program outside this package needs to feed the model."""
        return {"gray": f"{self.bit_depth}-bit gray (DICOM: modality LUT, VOI window, MONOCHROME1 inverted; more bits: "
                        "mapped over the range used)",
                "fit_rule": "pad: centred on a black square as wide as the longer side; squash: resized as it is",
                "resize": "OpenCV INTER_AREA to image_size x image_size", "image_size": self.side,
                "normalise": "(x - gray_mean) / gray_std", **{k: v for k, v in asdict(self).items() if k != "side"}}
