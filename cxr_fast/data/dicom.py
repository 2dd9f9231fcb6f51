"""DICOM radiographs as the pipeline's 8-bit gray image (pydicom).

The stored values go through the modality LUT (rescale slope and intercept), then to 0-255 by the VOI LUT or the
window (center, width; the DICOM linear function, PS3.3 C.11.2.1.2) when the file has one, else by the range of the
stored bit depth; MONOCHROME1 (white = low values) is inverted. An 8-bit MONOCHROME2 image without a window comes
out unchanged, so a PNG and its DICOM twin give the same pixels. RLE decodes with pydicom alone; JPEG, JPEG-LS and
JPEG 2000 need pylibjpeg (with pylibjpeg-libjpeg / pylibjpeg-openjpeg) or python-gdcm, and a file that needs one
missing says which. Colour and multi-frame files are refused: a chest X-ray here is one gray image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_fast.errors import BadInput

DICOM_SUFFIXES = (".dcm", ".dicom")
DECODERS = ("pylibjpeg with pylibjpeg-libjpeg (JPEG, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000), or python-gdcm")


def looks_like_dicom(path: Path, head: bytes | None = None) -> bool:
    """A .dcm/.dicom name, or the 'DICM' marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return False
    return head[128:132] == b"DICM"


def _dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError) as error:
        raise BadInput(path, f"not a readable DICOM file ({type(error).__name__}: {str(error)[:150]})") from None


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
    if max_pixels is not None and rows * columns > max_pixels:
        raise BadInput(path, f"the image claims {columns} x {rows} pixels, more than --max-pixels {max_pixels}")


def _pixels(ds, path: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as error:  # pydicom raises RuntimeError/NotImplementedError/ValueError by decoder and version
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False) and "RLE" not in name:
            raise BadInput(path, f"compressed as {name}, which needs a decoder: install {DECODERS}") from None
        raise BadInput(path, f"pixel data does not decode ({type(error).__name__}: {str(error)[:150]})") from None


def _stored_range(ds) -> tuple[float, float]:
    """The range of the stored values after the modality LUT (for scaling when there is no window)."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if int(ds.get("PixelRepresentation", 0) or 0) else \
        (0, 2 ** bits - 1)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def _first(value) -> float:
    """The first of a multi-valued window (several windows may be offered: the first is the default)."""
    try:
        return float(value)
    except TypeError:
        return float(value[0])


def to_unit_range(ds, values: np.ndarray) -> np.ndarray:
    """Modality LUT, then VOI LUT or window or the stored range → floats in [0, 1] (MONOCHROME2 sense)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(values, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64) / (2 ** out_bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        values = (values - (center - 0.5)) / max(width - 1, 1.0) + 0.5
    else:
        low, high = _stored_range(ds)
        values = (values - low) / max(high - low, 1e-9)
    values = np.clip(values, 0.0, 1.0)
    return 1.0 - values if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1" else values


def read_dicom(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """The gray uint8 image of a single-frame monochrome DICOM file; BadInput with the reason otherwise."""
    ds = _dataset(path)
    _check(ds, path, max_pixels)
    values = _pixels(ds, path)
    if values.ndim != 2:
        raise BadInput(path, f"unexpected pixel array shape {values.shape}")
    return np.rint(to_unit_range(ds, values) * 255.0).astype(np.uint8)
