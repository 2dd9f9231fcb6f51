"""DICOM radiographs as the pipeline's 8-bit gray image (pydicom).

The stored values go through the modality LUT (rescale slope and intercept), then to the 8-bit gray scale
(`preprocess.py`) by the VOI LUT or the window (center, width; the DICOM linear function, PS3.3 C.11.2.1.2) when the
file has one, else by the range of the stored bit depth; MONOCHROME1 (white = low values) is inverted. An 8-bit
MONOCHROME2 image without a window comes out unchanged, so a PNG and its DICOM twin give the same pixels. RLE decodes with pydicom alone; JPEG, JPEG-LS and
JPEG 2000 need pylibjpeg (with pylibjpeg-libjpeg / pylibjpeg-openjpeg) or python-gdcm, and a file that needs one
missing says which. Colour and multi-frame files are refused: a chest X-ray here is one gray image. The size limit
holds before any decoding: Rows x Columns, the compressed payload's own header, and a bounded inflate of deflated
files. pydicom is imported where it is used, on purpose: it is only needed when a DICOM file is read.
"""

from __future__ import annotations

import logging
import threading
import zlib
from pathlib import Path

import numpy as np

from cxr_fast.data.images.headers import image_header, inflated_size_within, read_regular
from cxr_fast.data.images.preprocess import gray8_from_unit, unit_from_gray8
from cxr_fast.errors import BadInput

DEFLATED = "1.2.840.10008.1.2.1.99"  # deflated explicit VR little endian
RLE = "1.2.840.10008.1.2.5"
HEADER_ALLOWANCE = 1 << 24  # what a dataset holds besides its pixels, at most (16 MiB)

DICOM_SUFFIXES = (".dcm", ".dicom")
DECODERS = ("pylibjpeg with pylibjpeg-libjpeg (JPEG, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), or python-gdcm")


def looks_like_dicom(path: Path, head: bytes | None = None) -> bool:
    """A .dcm/.dicom name, or the 'DICM' marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if head is None:
        try:
            head = read_regular(path, 0, head=132)
        except OSError:  # not a regular file, or unreadable: not a DICOM file to look at
            return False
    return head[128:132] == b"DICM"


def _dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, NotImplementedError,
            TypeError, zlib.error) as error:
        raise BadInput(path, f"not a readable DICOM file ({type(error).__name__}: {str(error)[:150]})") from None


def _check_deflated(path: Path, max_pixels: int | None) -> None:
    """A deflate-compressed file (deflated explicit VR little endian) is inflated whole by pydicom before anything
    else: inflate it first without keeping the output, and refuse one that grows past what `max_pixels` 16-bit
    pixels and a header need."""
    from pydicom.filereader import read_file_meta_info

    if max_pixels is None:
        return
    try:
        meta = read_file_meta_info(path)
    except Exception:  # no readable file meta: dcmread reports what is wrong
        return
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    limit = 2 * max_pixels + HEADER_ALLOWANCE
    data = path.read_bytes()
    start = meta_end(data)  # walked element by element: the stated group length may lie
    stated = meta.get("FileMetaInformationGroupLength")
    if stated is not None and int(stated) != start - 144:
        raise BadInput(path, f"the file meta group length ({meta.get('FileMetaInformationGroupLength')}) is not the "
                             f"group's ({start - 144}): refused before inflating")
    try:
        within = inflated_size_within(data[start:], limit)
    except zlib.error as error:
        raise BadInput(path, f"deflated DICOM data is corrupt ({error})") from None
    if not within:
        raise BadInput(path, f"deflated DICOM data inflates past {limit:,} bytes (--max-pixels {max_pixels} at 16 "
                             "bits): refused before reading")


def meta_end(data: bytes) -> int:
    """Where the file meta group (0002,xxxx, explicit VR little endian, after the preamble and DICM) ends, walked
    element by element."""
    i = 132
    while i + 8 <= len(data) and data[i:i + 2] == b"\x02\x00":
        if data[i + 4:i + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            i += 12 + int.from_bytes(data[i + 8:i + 12], "little")
        else:
            i += 8 + int.from_bytes(data[i + 6:i + 8], "little")
    return i


def _check_payload(ds, path: Path, rows: int, columns: int) -> None:
    """Compressed pixel data (JPEG, JPEG-LS, JPEG 2000) is sized from its own header before it is decoded: it must
    be the image Rows and Columns describe (RLE decodes to exactly that size, so it needs no check)."""
    from pydicom.encaps import generate_frames

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or syntax == RLE:
        return
    first = next(generate_frames(ds.PixelData, number_of_frames=1), b"")
    header = image_header(bytes(first[:1 << 20]))
    if header is None:
        raise BadInput(path, f"compressed pixel data ({syntax.name}) whose size cannot be read from its own header: "
                             "refused before decoding")
    size = (header.width, header.height)
    if header.components != 1 or header.problem(None):
        raise BadInput(path, f"the compressed image claims {header.components} component(s) of {header.bits} bits; "
                             "a gray radiograph has one: refused before decoding")
    if size != (columns, rows):
        raise BadInput(path, f"the compressed image is {size[0]} x {size[1]} pixels, but the header says {columns} x "
                             f"{rows}: refused before decoding")
    if not bytes(first[-64:]).rstrip(b"\0").endswith(b"\xff\xd9"):  # JPEG's EOI, JPEG 2000's EOC: same bytes
        raise BadInput(path, f"the {syntax.name} data is truncated (no end marker): refused, as a truncated JPEG "
                             "file is")


def _check(ds, path: Path, max_pixels: int | None) -> None:
    if "PixelData" not in ds:
        marker = getattr(ds, "preamble", None) is not None or "SOPClassUID" in ds
        raise BadInput(path, "DICOM file without pixel data" if marker else "not a DICOM file (no DICOM header)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadInput(path, f"multi-frame DICOM ({frames} frames): one radiograph per file is expected")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadInput(path, f"colour DICOM ({photometric}): a chest radiograph is expected to be gray")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if int(ds.get("BitsAllocated", 16) or 16) not in (1, 8, 16, 32):
        raise BadInput(path, f"BitsAllocated {ds.get('BitsAllocated')} is not 1, 8, 16 or 32")
    if max_pixels is not None and rows * columns > max_pixels:
        raise BadInput(path, f"the image claims {columns} x {rows} pixels, more than --max-pixels {max_pixels}")
    _check_payload(ds, path, rows, columns)


def _decoder_installed(name: str) -> bool:
    """Whether a decoder pydicom can use for this compression is installed."""
    import importlib.util

    modules = ("openjpeg", "gdcm") if "2000" in name else ("libjpeg", "gdcm")
    return any(importlib.util.find_spec(module) is not None for module in modules)


class DecoderMessages(logging.Filter):
    """pydicom's decoder messages (one plugin failing before another decodes, with its traceback), kept for the file
    this thread decodes instead of printed: a decoder that calls the data corrupt makes the file a bad input, even
    when a more lenient one (Pillow) then decodes something."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        kept = getattr(self.local, "messages", None)
        if kept is None:  # not inside a decode of ours: pydicom logs as it would
            return True
        if record.levelno >= logging.WARNING:
            kept.append(record.getMessage())
        return False


DECODER_MESSAGES = DecoderMessages()
logging.getLogger("pydicom.pixels.decoders.base").addFilter(DECODER_MESSAGES)


def _pixels(ds, path: Path) -> np.ndarray:
    DECODER_MESSAGES.local.messages = []
    try:
        pixels = ds.pixel_array
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError by decoder and version
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax))
        compressed = syntax is not None and getattr(syntax, "is_compressed", False) and "RLE" not in name
        if compressed and not _decoder_installed(name):
            raise BadInput(path, f"compressed as {name}, which needs a decoder: install {DECODERS}") from None
        reason = "is corrupt" if compressed else "does not decode"
        raise BadInput(path, f"pixel data {reason} ({type(error).__name__}: {str(error)[:150]})") from None
    finally:
        messages, DECODER_MESSAGES.local.messages = DECODER_MESSAGES.local.messages, None
    if messages:
        raise BadInput(path, f"a decoder found the pixel data corrupt ({messages[0][:150]}); not scored on what a "
                             "more lenient decoder made of it")
    return pixels


def _first(value) -> float:
    """The first of a multi-valued window (several windows may be offered: the first is the default)."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """A VOI window to [0, 1] as PS3.3 C.11.2.1.2 defines LINEAR, LINEAR_EXACT and SIGMOID."""
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:  # LINEAR's narrowest window is a step at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _lut_values(item) -> tuple[np.ndarray, int, int]:
    """(LUT entries, first mapped value, bits) of a VOI LUT item. A LUT whose values all stay below half of the
    stated depth is read at the depth it uses (a vendor quirk: 16 bits stated, 12-bit values held)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    lut = np.frombuffer(data, np.uint16 if bits > 8 else np.uint8) if isinstance(data, bytes) else np.asarray(data)
    lut = lut.astype(np.float64).ravel()[:entries or 65536]
    top = int(lut.max()) if len(lut) else 0
    if top < 2 ** (bits - 1):
        bits = max(top.bit_length(), 1)
    return lut, first, bits


def _voi(ds, values: np.ndarray, path: Path) -> np.ndarray | None:
    """The VOI LUT or the window of the file, to [0, 1]; None where the file has neither."""
    if "VOILUTSequence" in ds:
        lut, first, bits = _lut_values(ds.VOILUTSequence[0])
        index = np.clip(np.rint(values) - first, 0, len(lut) - 1).astype(np.int64)
        return lut[index] / (2 ** bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if width <= 0 or (function.strip().upper() == "LINEAR" and width < 1):
            raise BadInput(path, f"WindowWidth {width} is not a window (it must be > 0, and >= 1 for LINEAR)")
        return window(values, center, width, function)
    return None


def to_unit_range(ds, values: np.ndarray, path: Path) -> np.ndarray:
    """As a viewer renders it, to floats in [0, 1] (MONOCHROME2 sense): the modality LUT (rescale, or a Modality LUT
    sequence), then the VOI LUT or the window; without either, 8-bit data as it is and deeper data over the range
    actually present (12-bit data using a quarter of its range would otherwise reach the model nearly black)."""
    from pydicom.pixels import apply_modality_lut

    if "RescaleSlope" in ds and float(ds.RescaleSlope) == 0:
        raise BadInput(path, "RescaleSlope is 0: every pixel would have one value")
    rescaled = "ModalityLUTSequence" in ds or float(ds.get("RescaleSlope", 1) or 1) != 1 or \
        float(ds.get("RescaleIntercept", 0) or 0) != 0
    values = apply_modality_lut(values, ds).astype(np.float64)
    unit = _voi(ds, values, path)
    if unit is None:
        if int(ds.get("BitsStored", 8) or 8) <= 8 and not rescaled:
            unit = unit_from_gray8(values)
        else:
            low, high = float(values.min()), float(values.max())
            unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    unit = np.clip(unit, 0.0, 1.0)
    return 1.0 - unit if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1" else unit


def identifiers(ds) -> dict:
    """What identifies a DICOM image in a results table, and what says whether it is a chest radiograph."""
    fields = {"sop_instance_uid": "SOPInstanceUID", "study_instance_uid": "StudyInstanceUID",
              "view_position": "ViewPosition", "modality": "Modality", "body_part": "BodyPartExamined",
              "sop_class_uid": "SOPClassUID"}
    return {name: str(ds.get(tag, "") or "").strip() for name, tag in fields.items()}


def render(ds, path: Path | str = "dataset", max_pixels: int | None = None) -> np.ndarray:
    """The gray uint8 image of a pydicom dataset (single-frame, monochrome), rendered as above."""
    path = Path(path)
    try:
        _check(ds, path, max_pixels)
        values = _pixels(ds, path)
        if values.ndim != 2:
            raise BadInput(path, f"unexpected pixel array shape {values.shape}")
        return gray8_from_unit(to_unit_range(ds, values, path))
    except BadInput:
        raise
    except Exception as error:  # a header value of the wrong type or form, wherever pydicom or we read it
        raise BadInput(path, f"unusable DICOM header ({type(error).__name__}: {str(error)[:150]})") from None


def read_dicom_source(path: Path, max_pixels: int | None = None) -> tuple[np.ndarray, dict]:
    """(gray uint8, identifiers) of a single-frame monochrome DICOM file; BadInput with the reason otherwise,
    whatever the header holds (a text WindowCenter or NumberOfFrames, a private transfer syntax): one bad file is one
    bad input, never the end of a batch."""
    _check_deflated(path, max_pixels)
    ds = _dataset(path)
    return render(ds, path, max_pixels), identifiers(ds)


def read_dicom(path: Path, max_pixels: int | None = None) -> np.ndarray:
    return read_dicom_source(path, max_pixels)[0]
