"""Image sizes read from headers before anything is decoded, so a size limit holds on every path to a decoder: PNG's
IHDR, JPEG's start-of-frame (baseline, progressive, lossless and JPEG-LS, found the way libjpeg finds it, past junk
bytes and fill), JPEG 2000's SIZ, and a bounded inflate for deflate-compressed DICOM files. A file whose size cannot
be read is refused rather than decoded blind."""

from __future__ import annotations

import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG, CC DAC are not frames) and JPEG-LS SOF55 (F7).
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
_SOS, _EOI = 0xDA, 0xD9


def jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or JPEG-LS stream from its first start-of-frame segment; None when there is none
    before the first scan. Bytes other than a marker between segments are skipped, as libjpeg skips them."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:  # junk before a marker: libjpeg warns and searches on
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xFF, 0x00):  # fill byte, or a stuffed zero in junk
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (_SOS, _EOI) or i + 9 > n:
            return None
        if marker in _SOF:
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def jpeg2000_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 codestream's SIZ segment (bare, or inside a JP2 file's jp2c box)."""
    start = data.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 26 > len(data):
        return None
    siz = start + 4
    x, y = int.from_bytes(data[siz + 4:siz + 8], "big"), int.from_bytes(data[siz + 8:siz + 12], "big")
    x0, y0 = int.from_bytes(data[siz + 12:siz + 16], "big"), int.from_bytes(data[siz + 16:siz + 20], "big")
    return (x - x0, y - y0) if x > x0 and y > y0 else None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, JPEG-LS or JPEG 2000 header; None when the data is none of them or its
    header holds no size."""
    if data[:8] == PNG_SIGNATURE:
        return (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) if data[12:16] == b"IHDR" \
            else None
    if data[:2] == b"\xff\xd8":
        return jpeg_dimensions(data)
    return jpeg2000_dimensions(data[:1 << 16])


def inflated_size_within(data: bytes, limit: int) -> bool:
    """Whether raw deflate data inflates to at most `limit` bytes, found without holding more than a chunk of it.
    The stream's end (or input that produces nothing more, a truncated stream) ends the count."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, chunk, pending = 0, 1 << 20, data
    while True:
        out = inflater.decompress(pending, chunk)
        total += len(out)
        if total > limit:
            return False
        if inflater.eof:
            return True
        pending = inflater.unconsumed_tail
        if not out and not pending:
            return True
