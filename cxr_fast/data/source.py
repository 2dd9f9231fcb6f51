"""Reading a source image (PNG, JPEG or DICOM) as the pipeline's 8-bit gray image, with the size limit checked
before decoding, and the one image finder that `shard` and `predict` share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from cxr_fast.data.dicom import looks_like_dicom, read_dicom
from cxr_fast.data.headers import PNG_SIGNATURE, image_dimensions
from cxr_fast.errors import BadInput, CxrFastError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def is_image_file(path: Path) -> bool:
    """PNG, JPEG or DICOM by suffix, or any other file that carries the DICOM marker (hospital exports name files by
    their UID, `1.2.840.113619.2.55...`, or give them no suffix at all)."""
    return path.name.lower().endswith(IMAGE_SUFFIXES) or looks_like_dicom(path)


def image_files(folder: Path) -> Iterator[Path]:
    """The image files below `folder`, recursively, in a stable order; an unreadable folder is an error."""
    if not folder.is_dir():
        raise CxrFastError(f"image folder not found: {folder}")

    def unreadable(error: OSError) -> None:
        raise CxrFastError(f"cannot read folder {error.filename}: {error.strerror}")

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if is_image_file(path):
                yield path


def to_gray8(image: np.ndarray, path: Path | str = "") -> np.ndarray:
    """The documented rule for non-gray inputs.

    16-bit: keep the high byte (a linear rescale; NIH ships 8-bit, other exports may not). 3 or 4 channels: drop the
    alpha channel (NIH's RGBA PNGs are fully opaque) and take ITU-R BT.601 luma (OpenCV's BGR2GRAY, the same as
    `cv2.imread(..., IMREAD_GRAYSCALE)`); for NIH's RGBA files R = G = B, so the result is exactly that channel.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadInput(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    elif image.ndim != 2:
        raise BadInput(path, f"unsupported image shape {image.shape}")
    return image


def read_gray(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, bytes, bool]:
    """Decode a source image (PNG, JPEG or DICOM). Returns (gray uint8, file bytes, whether the file already is an
    8-bit gray PNG).

    The header's size is checked against `max_pixels` before anything is decoded (a decompression bomb is a
    small file that claims an enormous image)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(path, f"unreadable ({error.strerror})") from None
    if looks_like_dicom(path, data[:132]):
        return read_dicom(path, max_pixels), data, False
    size = image_dimensions(data)
    if size is None:
        what = "a PNG or JPEG file without a readable size in its header" if data[:8] == PNG_SIGNATURE or \
            data[:2] == b"\xff\xd8" else "not a PNG, JPEG or DICOM file"
        raise BadInput(path, f"{what}: refused before decoding")
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise BadInput(path, f"the image claims {size[0]} x {size[1]} pixels, more than --max-pixels {max_pixels}")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error as error:  # OpenCV refuses some sizes and corrupt streams by raising
        raise BadInput(path, f"not decodable ({str(error).strip().splitlines()[-1][:200]})") from None
    if image is None:
        raise BadInput(path, "not a decodable image (truncated or not an image file)")
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise BadInput(path, f"the image has {image.shape[1]} x {image.shape[0]} pixels, more than --max-pixels "
                             f"{max_pixels}")
    is_gray_png = data[:8] == b"\x89PNG\r\n\x1a\n" and image.dtype == np.uint8 and image.ndim == 2
    return to_gray8(image, path), data, is_gray_png
