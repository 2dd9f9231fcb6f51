"""Reading a source image (PNG, JPEG or DICOM) as the pipeline's 8-bit gray image, with the size limit checked
before decoding, and the one image finder that `shard` and `predict` share."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cxr_fast.data.images.dicom import looks_like_dicom, read_dicom_source
from cxr_fast.data.images.headers import PNG_SIGNATURE, file_limit, image_header, read_regular
from cxr_fast.data.images.preprocess import gray8_over_range, gray_share
from cxr_fast.config import MAX_PIXELS
from cxr_fast.errors import BadInput, CxrFastError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def is_image_file(path: Path) -> bool:
    """PNG, JPEG or DICOM by suffix, or any other file that carries the DICOM marker (hospital exports name files by
    their UID, `1.2.840.113619.2.55...`, or give them no suffix at all)."""
    return path.name.lower().endswith(IMAGE_SUFFIXES) or looks_like_dicom(path)


def image_files(folder: Path, exclude: Path | None = None) -> Iterator[Path]:
    """The image files below `folder`, recursively (symlinked folders followed, each real folder once), in a stable
    order, leaving out the folder `exclude` (a command's own output inside its input); an unreadable folder is an
    error."""
    if not folder.is_dir():
        raise CxrFastError(f"image folder not found: {folder}")

    def unreadable(error: OSError) -> None:
        raise CxrFastError(f"cannot read folder {error.filename}: {error.strerror}")

    skip = exclude.resolve() if exclude is not None else None
    visited = set()
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        real = Path(root).resolve()
        if real in visited or (skip is not None and (real == skip or skip in real.parents)):
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if is_image_file(path):
                yield path


@dataclass
class SourceImage:
    """A source image as the pipeline reads it: 8-bit gray, the file's bytes, the shard encoding those bytes already
    are (png: an 8-bit gray PNG; jpeg: a JPEG without an EXIF turn; None: neither; shards then copy them), what
    identifies it (DICOM UIDs, view, modality, body part) and warnings."""

    gray: np.ndarray
    data: bytes
    stored_as: str | None
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def to_gray8(image: np.ndarray, path: Path | str = "") -> np.ndarray:
    """The documented rule for non-gray inputs.

    16-bit: over the range actually present, as a viewer shows DICOM data without a window (the high byte alone left
    12-bit data nearly black). 3 or 4 channels: drop the alpha channel (NIH's RGBA PNGs are fully opaque) and take
    ITU-R BT.601 luma (OpenCV's BGR2GRAY, the same as `cv2.imread(..., IMREAD_GRAYSCALE)`); for NIH's RGBA files
    R = G = B, so the result is exactly that channel.
    """
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)  # colour at 16 bits is not a radiograph; keep it simple
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    elif image.ndim != 2:
        raise BadInput(path, f"unsupported image shape {image.shape}")
    if image.dtype == np.uint16:
        image = gray8_over_range(image)
    elif image.dtype != np.uint8:
        raise BadInput(path, f"unsupported pixel type {image.dtype}")
    return image


def gray_range_warning(gray: np.ndarray, share: float) -> str | None:
    """A warning when the 8-bit image spans less than `share` of the gray range (1st to 99th percentile): a dark,
    washed-out or flat image that the model would score as if it were a radiograph."""
    low, high = np.percentile(gray[:: max(1, gray.shape[0] // 512), :: max(1, gray.shape[1] // 512)], (1, 99))
    used = gray_share(low, high)
    if used < share:
        return f"the image uses {100 * used:.0f}% of the gray range (1st-99th percentile): dark, washed out or flat"
    return None


def _check_header(path: Path, data: bytes, max_pixels: int | None) -> None:
    """Refuse, before decoding, what the file's own header says a decoder should not be handed."""
    header = image_header(data)
    if header is None:
        what = "not a decodable image (a PNG or JPEG header without a readable size)" if \
            data[:8] == PNG_SIGNATURE or data[:2] == b"\xff\xd8" else "not a PNG, JPEG or DICOM file"
        raise BadInput(path, f"{what}: refused before decoding")
    problem = header.problem(max_pixels)
    if problem:
        raise BadInput(path, f"{problem}: refused before decoding")
    if header.format == "JPEG" and header.bits != 8:
        raise BadInput(path, f"a {header.bits}-bit JPEG: only 8-bit JPEG files are read (save it as a 16-bit PNG or "
                             "a DICOM file)")
    if header.format == "JPEG":
        _check_jpeg_stream(path, data)


def _check_jpeg_stream(path: Path, data: bytes) -> None:
    """Refuse a JPEG whose entropy-coded data is corrupt. OpenCV's decoder only prints libjpeg's warning ("Corrupt
    JPEG data") and returns an image; Pillow's raises on it. Its draft mode decodes every coefficient (so every
    corrupt segment is found) at an eighth of the side, about as long as the full decode takes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("L", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except Image.DecompressionBombError:  # Pillow's own pixel limit, below --max-pixels, already checked: nothing to add
        return
    except (OSError, ValueError, SyntaxError) as error:
        raise BadInput(path, f"corrupt JPEG data ({str(error)[:120]}): not scored on what a lenient decoder makes "
                             "of it") from None


def read_gray(path: Path, max_pixels: int | None = None) -> SourceImage:
    """Decode a source image (PNG, JPEG or DICOM) to 8-bit gray.

    The header's size is checked against `max_pixels` before anything is decoded (a decompression bomb is a
    small file that claims an enormous image). JPEG files are turned as their EXIF orientation says."""
    try:
        data = read_regular(path, file_limit(max_pixels or MAX_PIXELS))
    except OSError as error:
        raise BadInput(path, f"unreadable ({error.strerror})") from None
    if looks_like_dicom(path, data[:132]):
        gray, meta = read_dicom_source(path, max_pixels)
        return SourceImage(gray, data, None, meta)
    _check_header(path, data, max_pixels)
    # JPEG: 8-bit gray with the EXIF orientation applied; PNG: as stored (16 bits kept for the rule above).
    flags = cv2.IMREAD_GRAYSCALE if data[:2] == b"\xff\xd8" else cv2.IMREAD_UNCHANGED
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as error:  # OpenCV refuses some sizes and corrupt streams by raising
        raise BadInput(path, f"not decodable ({str(error).strip().splitlines()[-1][:200]})") from None
    if image is None:
        raise BadInput(path, "not a decodable image (truncated or not an image file)")
    if data[:8] == PNG_SIGNATURE:
        stored_as = "png" if image.dtype == np.uint8 and image.ndim == 2 else None
    else:  # every decoder shows an EXIF-free JPEG the same way; with EXIF only OpenCV would turn it
        stored_as = None if b"Exif\x00\x00" in data[:65536] else "jpeg"
    return SourceImage(to_gray8(image, path), data, stored_as)
