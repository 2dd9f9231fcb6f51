"""A shard sample's components: the stored image encodings (one table: the name users type → the file extension
inside the tar) with their encoder and decoder, and the fixed-size key component that lets DALI batches carry image
names."""

from __future__ import annotations

import cv2
import numpy as np

# --encoding → the extension of the sample's image component (what DALI's reader is told to read).
EXTENSIONS = {"png": "png", "jpeg": "jpg", "raw": "raw"}
ID_BYTES = 64


def encode_image(gray: np.ndarray, encoding: str, jpeg_quality: int) -> dict[str, bytes]:
    """The image component(s) of a sample, keyed by extension."""
    if encoding == "png":
        _ok, buf = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        return {"png": buf.tobytes()}
    if encoding == "jpeg":
        _ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
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
