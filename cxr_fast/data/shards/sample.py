"""A shard sample's components: the encoding registry (the stored image encodings: the name `--encoding` takes, the
image component's extension inside the tar, its dtype, whether it is lossless, its CPU encoder and decoder, and how
DALI decodes it) and the fixed-size key component that lets DALI batches carry image names.

A new encoding is one entry of `ENCODINGS` (and its name among `ShardConfig.encoding`'s choices); the writer, `verify`,
both loaders and the benchmarks read it from here. docs/ARCHITECTURE.md lists the files to touch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from cxr_fast.config import MAX_PIXELS
from cxr_fast.data.images.headers import image_header

ID_BYTES = 64


@dataclass(frozen=True)
class Encoding:
    name: str  # what --encoding takes
    ext: str  # the image component inside the tar: what DALI's reader is told to read
    lossless: bool
    dali: str  # "image": fn.decoders.image (on a GPU: nvJPEG for JPEG, nvJPEG2000 for JPEG 2000, PNG on the CPU);
    # "raw": the bytes reshaped by the sample's `shape` component, no decoding
    encode: Callable[[np.ndarray, int], dict[str, bytes]]  # (8-bit gray, quality) → components by extension
    dtype: str = "uint8"


def _codec(suffix: str, ext: str, params: Callable[[int], list[int]]):
    def encode(gray: np.ndarray, quality: int) -> dict[str, bytes]:
        ok, buf = cv2.imencode(suffix, gray, params(quality))
        if not ok:
            raise ValueError(f"OpenCV cannot encode {suffix}")
        return {ext: buf.tobytes()}
    return encode


def _raw(gray: np.ndarray, _quality: int) -> dict[str, bytes]:
    shape = np.array([gray.shape[0], gray.shape[1], 1], dtype=np.int32)
    return {"raw": np.ascontiguousarray(gray).tobytes(), "shape": shape.tobytes()}


ENCODINGS = {encoding.name: encoding for encoding in (
    Encoding("png", "png", True, "image", _codec(".png", "png", lambda _q: [cv2.IMWRITE_PNG_COMPRESSION, 3])),
    Encoding("jpeg", "jpg", False, "image", _codec(".jpg", "jpg", lambda q: [cv2.IMWRITE_JPEG_QUALITY, q])),
    Encoding("raw", "raw", True, "raw", _raw),
    # Lossless JPEG 2000 (OpenCV's reversible 5/3 wavelet at compression x1000 = 1000): smaller than PNG on
    # radiographs, decoded on the GPU by nvJPEG2000.
    Encoding("j2k", "jp2", True, "image",
             _codec(".jp2", "jp2", lambda _q: [cv2.IMWRITE_JPEG2000_COMPRESSION_X1000, 1000])),
)}
EXTENSIONS = {name: encoding.ext for name, encoding in ENCODINGS.items()}  # --encoding → the component's extension
BY_EXTENSION = {encoding.ext: encoding for encoding in ENCODINGS.values()}


def encode_image(gray: np.ndarray, encoding: str, quality: int) -> dict[str, bytes]:
    """The image component(s) of a sample, keyed by extension."""
    return ENCODINGS[encoding].encode(gray, quality)


def image_component(sample: dict) -> tuple[Encoding, bytes]:
    """The sample's stored image: its encoding and bytes."""
    for ext, encoding in BY_EXTENSION.items():
        if sample.get(ext) is not None:
            return encoding, sample[ext]
    raise ValueError(f"sample {sample.get('__key__')} has no image component")


def decode_image(sample: dict, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The gray uint8 image of a sample as read back from a shard (dict of extension -> bytes), sized from its own
    header first like any input: a forged member claiming more than `max_pixels` (or more than one 8-bit component)
    is refused before it is decoded."""
    encoding, payload = image_component(sample)
    if encoding.dali == "raw":
        height, width, _ = np.frombuffer(sample["shape"], np.int32)
        return np.frombuffer(payload, np.uint8).reshape(height, width)
    header = image_header(payload[:1 << 20])
    if header is None or header.problem(max_pixels) or header.bits > 8:
        problem = header.problem(max_pixels) if header else "no readable image header"
        raise ValueError(f"sample {sample.get('__key__')}: {problem or f'{header.bits}-bit image'}; refused before "
                         "decoding")
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
