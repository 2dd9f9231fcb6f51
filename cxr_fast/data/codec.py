"""Image and key codecs of a shard sample: source images to 8-bit gray, the stored encodings (png, jpg, raw) and back,
and the fixed-size key component that lets DALI batches carry image names."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

IMAGE_EXT = {"png": "png", "jpeg": "jpg", "raw": "raw"}  # --encoding -> the sample's image component
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
ID_BYTES = 64


class BadInput(Exception):
    """An input image that cannot be sharded; carries the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # exceptions cross the process pool by pickle; the default would lose `reason`
        return BadInput, (self.path, self.reason)


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


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, read before decoding; None for other formats."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame segment
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def read_gray(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, bytes, bool]:
    """Decode a source image (PNG, JPEG or DICOM). Returns (gray uint8, file bytes, whether the file already is an
    8-bit gray PNG).

    The header's size is checked against `max_pixels` before anything is decoded (a decompression bomb is a
    small file that claims an enormous image)."""
    from cxr_fast.data.dicom import looks_like_dicom, read_dicom

    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(path, f"unreadable ({error.strerror})") from None
    if looks_like_dicom(path, data[:132]):
        return read_dicom(path, max_pixels), data, False
    size = image_dimensions(data)
    if size is not None and max_pixels is not None and size[0] * size[1] > max_pixels:
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


def encode_image(gray: np.ndarray, encoding: str, jpeg_quality: int = 95) -> dict[str, bytes]:
    """The image component(s) of a sample."""
    if encoding == "png":
        ok, buf = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        return {"png": buf.tobytes()}
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        return {"jpg": buf.tobytes()}
    shape = np.array([gray.shape[0], gray.shape[1], 1], dtype=np.int32)
    return {"raw": np.ascontiguousarray(gray).tobytes(), "shape": shape.tobytes()}


def decode_image(sample: dict) -> np.ndarray:
    """The gray uint8 image of a sample as read back from a shard (dict of extension -> bytes)."""
    if "raw" in sample:
        height, width, _ = np.frombuffer(sample["shape"], np.int32)
        return np.frombuffer(sample["raw"], np.uint8).reshape(height, width)
    payload = sample.get("png") or sample.get("jpg")
    if payload is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image component")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"sample {sample.get('__key__')}: image does not decode")
    return image


def encode_id(key: str) -> bytes:
    raw = key.encode("ascii")
    if len(raw) > ID_BYTES:
        raise ValueError(f"key {key!r} is longer than {ID_BYTES} bytes")
    return raw.ljust(ID_BYTES, b"\0")


def decode_id(raw: np.ndarray | bytes) -> str:
    return bytes(raw).rstrip(b"\0").decode("ascii")
