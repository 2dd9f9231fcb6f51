"""Image sizes read from headers before anything is decoded, so a size limit holds on every path to a decoder: PNG's
IHDR, JPEG's start-of-frame (baseline, progressive, lossless and JPEG-LS, found the way libjpeg finds it, past junk
bytes and fill), JPEG 2000's SIZ, and a bounded inflate for deflate-compressed DICOM files. The format is decided by
the file's own magic bytes, and the size read from that format's header only (never a marker found elsewhere in the
file); with it come the components, the bit depth and, for JPEG, the number of scans, so that what a decoder would
allocate and how long it would work are bounded too. A file whose size cannot be read is refused rather than decoded
blind."""

from __future__ import annotations

import os
import stat
import zlib
from pathlib import Path
from typing import NamedTuple

# What a decoder may be asked for, beyond the pixel limit: a radiograph has 1 (gray) to 4 (RGBA) components of at
# most 16 bits, and a progressive JPEG a few dozen scans (libjpeg's own progressive scripts use 10); 20,000 repeated
# scans make a 2 MB file take minutes.
MAX_COMPONENTS, MAX_BITS, MAX_JPEG_SCANS = 4, 16, 100


class Header(NamedTuple):
    """What a header says the decoded image is: its size, components, bits per component and (JPEG) scans."""

    width: int
    height: int
    components: int
    bits: int
    scans: int = 1
    format: str = ""

    def problem(self, max_pixels: int | None) -> str | None:
        """Why a decoder should not be handed this image, or None."""
        if max_pixels is not None and self.width * self.height > max_pixels:
            return f"the image claims {self.width} x {self.height} pixels, more than --max-pixels {max_pixels}"
        if not 1 <= self.components <= MAX_COMPONENTS or not 1 <= self.bits <= MAX_BITS:
            return (f"the {self.format} header claims {self.components} components of {self.bits} bits (at most "
                    f"{MAX_COMPONENTS} of {MAX_BITS} are accepted)")
        if self.scans > MAX_JPEG_SCANS:
            return f"a JPEG of {self.scans} scans (at most {MAX_JPEG_SCANS} are accepted): decoding would not end soon"
        return None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG, CC DAC are not frames) and JPEG-LS SOF55 (F7).
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length
_SOS, _EOI = 0xDA, 0xD9


def jpeg_header(data: bytes) -> Header | None:
    """The header of a JPEG or JPEG-LS stream from its first start-of-frame segment; None when there is none
    before the first scan. Bytes other than a marker between segments are skipped, as libjpeg skips them. Scans are
    counted by their markers (entropy-coded data cannot hold one: a 0xFF there is followed by a stuffed 0)."""
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
            return Header(int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"),
                          data[i + 9], data[i + 4], data.count(b"\xff\xda"), "JPEG")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ: a bare JPEG 2000 codestream starts so
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def jpeg2000_header(data: bytes) -> Header | None:
    """The header of a JPEG 2000 codestream's SIZ segment: a bare codestream, or a JP2 file's jp2c box found by
    walking its boxes from the start (never a marker found elsewhere)."""
    start = 0 if data[:4] == J2K_CODESTREAM else _jp2c(data) if data[:12] == JP2_SIGNATURE else None
    if start is None or data[start:start + 4] != J2K_CODESTREAM or start + 42 > len(data):
        return None
    siz = start + 4
    x, y = int.from_bytes(data[siz + 4:siz + 8], "big"), int.from_bytes(data[siz + 8:siz + 12], "big")
    x0, y0 = int.from_bytes(data[siz + 12:siz + 16], "big"), int.from_bytes(data[siz + 16:siz + 20], "big")
    components = int.from_bytes(data[siz + 36:siz + 38], "big")
    bits = max(((data[siz + 38 + 3 * c] & 0x7F) + 1 for c in range(min(components, 16384))
                if siz + 38 + 3 * c < len(data)), default=0)
    return Header(x - x0, y - y0, components, bits, 1, "JPEG 2000") if x > x0 and y > y0 else None


def _jp2c(data: bytes) -> int | None:
    """Where a JP2 file's codestream box (jp2c) begins its contents, walking the top-level boxes."""
    i = 0
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        header = 8
        if length == 1:
            length, header = int.from_bytes(data[i + 8:i + 16], "big"), 16
        if kind == b"jp2c":
            return i + header
        if length < header:
            return None
        i += length
    return None


def png_header(data: bytes) -> Header | None:
    if data[12:16] != b"IHDR" or len(data) < 26:
        return None
    components = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(data[25], 0)  # colour type: gray, RGB, palette, gray+A, RGBA
    return Header(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), components, data[24], 1,
                  "PNG")


def image_header(data: bytes) -> Header | None:
    """The header of a PNG, JPEG, JPEG-LS or JPEG 2000 file, by its own magic bytes; None for any other format (TIFF,
    BMP, WebP, ... are not sized here, so they are refused) or a header without a size."""
    if data[:8] == PNG_SIGNATURE:
        return png_header(data)
    if data[:2] == b"\xff\xd8":
        return jpeg_header(data)
    return jpeg2000_header(data[:1 << 20])


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from `image_header`."""
    header = image_header(data)
    return (header.width, header.height) if header else None


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


def file_limit(max_pixels: int) -> int:
    """The most bytes a source file of at most `max_pixels` pixels may hold: 4 components of 16 bits each (stored
    uncompressed at worst) and a header."""
    return 8 * max_pixels + (1 << 24)


def read_regular(path: Path, limit: int, head: int | None = None) -> bytes:
    """The bytes of a regular file (links resolved), at most `limit`, or the first `head`: a FIFO, a device such as
    /dev/zero, or a folder is refused without being read (opened without blocking, checked by fstat), and a file
    past `limit` is refused rather than read whole. OSError with the reason otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(0, "not a regular file (a pipe, device or folder): refused without reading")
        if head is None and info.st_size > limit:
            raise OSError(0, f"{info.st_size:,} bytes, more than the {limit:,} an image of --max-pixels may take")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(head if head is not None else limit + 1)
    finally:
        os.close(fd)
    if head is None and len(data) > limit:
        raise OSError(0, f"grew past {limit:,} bytes while read")
    return data
